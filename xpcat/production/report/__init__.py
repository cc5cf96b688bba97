"""``xpcat report``: the run's validation page.

- :mod:`~xpcat.production.report.data`: the catalog rows and reference values of a run;
- :mod:`~xpcat.production.report.statistics`: robust sigma, bias, pulls, Table 3's cut counts;
- :mod:`~xpcat.production.report.reliability`: are the error bars calibrated, the catastrophic failures per cut;
- :mod:`~xpcat.production.report.confidence_status`: per confidence parameter, trained or fell back and why;
- :mod:`~xpcat.production.report.evaluation`: the learned extinction curve and the flux residuals;
- :mod:`~xpcat.production.report.figures`: the PNG figures;
- :mod:`~xpcat.production.report.page`: the HTML page (``templates/index.html.j2``),
  validation.json and :func:`~xpcat.production.report.page.write_report`.
"""
