"""Evaluation: what In-Place TTT buys over its base, measured offline (see `ttt_adapt.eval.run`)."""

from ttt_adapt.eval.run import *  # noqa: F401,F403
from ttt_adapt.eval.run import __all__  # noqa: F401
