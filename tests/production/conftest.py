"""Puts ``tests/production`` on ``sys.path`` (pytest's prepend mode) so the stage tests in its sub-folders can import its shared helpers (``_archive_universe``, ``_fake_stages``, ``_slow_tasks``)."""
