"""Analysis: what a study's trials say, with intervals, and how it is reported.

Usage::

    from loraplace.analysis.from_store import analyze_store
    from loraplace.analysis.report import write_report
    a = analyze_store(store)                # StudyAnalysis: per-strategy stats, fronts, the recommendation
    a.recommendation.text
    paths = write_report("studies/default") # report.md, report.html and the figures

Modules, in the order they import one another (every import at module top, no cycle): ``text`` (how numbers and
intervals are written), ``verdict`` (the probe's auto against random placement), ``findings`` (the data types:
StrategyStats, Recommendation, StudyAnalysis), ``decision`` (cost tiers and the recommendation), ``study`` (a
study's trials -> StudyAnalysis, pure), ``racing`` (what racing did or would have done), ``from_store`` (the
analysis of an open store), ``tables`` (the results table, terminal summary), ``latex``, ``methods``, ``style``,
``figures``, ``decision_figures`` and ``report`` (Markdown and HTML). All torch-free; the statistics they use are
``core.stats``.
"""
