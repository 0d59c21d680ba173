"""Human feedback from a crowd: many raters label fixed policy outputs in a web app, on SQLite, with quality control.

Modules, in dependency order: ``stats`` (Krippendorff's alpha, agreement, votes, Bradley-Terry, z-scores,
Dawid-Skene), ``store`` (the SQLite store and the hand-out of work), ``sampling`` (a batch's responses, sampled once),
``quality`` (the lead's report and the export to training files), ``server`` (the web app), ``__main__`` (the
commands: ``python -m minirlhf.crowd --help``).
"""
