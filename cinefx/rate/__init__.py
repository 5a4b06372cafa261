"""Human judgement of renders: a blinded pairwise preference study and its tally.

    from cinefx.rate import make_study, tally_study, StudyServer
    study = make_study(["renders/base", "renders/epic"], "study")   # then open study/index.html
    tally_study("study", ["answers-….json"]).write_json("study/tally.json")

Importing this package imports no torch.
"""

from cinefx.rate.serve import DEFAULT_PORT, StudyServer
from cinefx.rate.study import QUESTIONS, Study, StudyOptions, make_study
from cinefx.rate.tally import PairTally, Tally, render_table, tally_study, wilson_interval

__all__ = ["DEFAULT_PORT", "QUESTIONS", "PairTally", "Study", "StudyOptions", "StudyServer", "Tally",
           "make_study", "render_table", "tally_study", "wilson_interval"]
