"""``xpcat report``: data, statistics, figures and the HTML page."""
