"""Analysis: what a study's trials say, with intervals, and how it is reported.

Usage::

    from loraplace.analysis.study import analyze_store
    from loraplace.analysis.report import write_report
    a = analyze_store(store)                # StudyAnalysis: per-strategy stats, fronts, the recommendation
    a.recommendation.text
    paths = write_report("studies/default") # report.md, report.html and the figures

Modules: ``study`` (a study's trials -> StudyAnalysis), ``decision`` (the recommendation), ``verdict`` (the
probe's auto against random placement), ``text`` (how numbers and intervals are written), ``tables`` (the
results table, terminal summary), ``report`` (Markdown and HTML), ``figures`` (PNG). All torch-free; the
statistics they use are ``core.stats``.
"""
