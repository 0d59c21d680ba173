"""What redteam.py is made of, apart from the core of RLHF: attack prompts and the search for new ones (attacks.py),
the judges of an output (judges.py), and the one-person labelling session at a terminal (labeling.py). The crowd's
web app is minirlhf/crowd/."""
