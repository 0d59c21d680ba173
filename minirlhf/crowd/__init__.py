"""Human feedback from a crowd: many raters label fixed policy outputs in a web app, on SQLite, with quality control.

See minirlhf/crowd/__main__.py for the commands (python -m minirlhf.crowd --help).
"""
