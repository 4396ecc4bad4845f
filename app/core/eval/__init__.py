"""Did training help? The held-out judgement of a run against its base model: forgetting probes
(probes.py), multiple-choice scoring (choices.py), what is asked of the model (ask.py), and the
before/after report (report.py, report_text.py, run_report.py)."""
