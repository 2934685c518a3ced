"""``tokensparse tune``: the most faithful reduction for a speed (or GMACs) target, measured here.

Every method here reduces a fixed number of tokens at each location, so a *schedule* (how
many tokens each location removes) is a spec string (``tome:r=[...]``,
``topk:locations=[...],tokens=[...]``, ``evit:...``, ``ppt:locations=[...],r=[...]``,
``evovit:keep_rate=[...]``), and so is a schedule of several methods (``mix``:
``ppt:...+tome:r=[...]+topk:...``, searched when named). :func:`tune` searches per-location
schedules of every training-free method for the one closest to the unreduced model at a given
speed-up:

1. *Images*: any folder (labels are not needed). The even positions are searched on (their
   first half *screens* schedules, their second half *selects* among the finalists, so the
   choice is not made on the images the screening fitted); the odd positions are held out,
   and every fidelity number reported comes from them. The unreduced model's logits are
   computed once.
2. *Fidelity*: agreement (same top-1) and mean KL(unreduced || reduced) of the logits. KL
   moves smoothly with the schedule, where top-1 on a few hundred images moves in steps of
   a whole image.
3. *Cost*, measured on this machine (the user's batch size, threads, device and dtype): one
   block timed at a grid of token counts, fitted and scaled to the unreduced model's measured
   time, summed over the token counts each block of a schedule computes on (from a one-image
   probe pass: the inputs of its attention and its MLP); plus each method's own work per
   reducing block, from timing its hand-set default for real. With a GMACs target the cost is
   the GMACs counted in the probe pass.
4. *Search*: a schedule is a *shape* (locations and relative weights: from one of the first
   blocks on, every block or every third, flat, falling or rising) scaled by bisection to the
   target (a little past it: timing varies), so every candidate is compared at the same
   speed. Each method's shapes are screened, the best shape also with every patch token its
   method can remove cut after the last block's attention (free for a class-token head: only
   the class token goes on), then the two best methods' best shapes are refined one location
   at a time (a step counts only when both halves of the screening images agree). A
   candidate's pass resumes at its first reducing block from the unreduced tokens kept there
   (Evo-ViT, whose global attention starts at block 0, runs whole).
5. *Finalists*: the best schedules, two points of the best shape on the way to the target
   (the front) and the hand-set defaults are timed for real against the unreduced model,
   interleaved in one run (a close call to the target: three times, the median counts), and
   evaluated on the selection and held-out images. Among the rows whose measured speed-up
   meets the target, the choice is the hand-set default with the highest mean log-probability
   of the unreduced model's top-1 class on the selection images (a statistic that tracks
   changed predictions; KL breaks ties), unless a searched schedule beats it there by more than
   two standard errors of the per-image differences: then the best such schedule.

The time budget covers the whole run: the search stops early to leave time for the
finalists, and a budget too small to reach the target still returns the best schedule
measured (flagged ``met_target=False``).


The package: :mod:`~tokensparse.tune.space` (the schedules searched), :mod:`~tokensparse.tune.cost`
(the cost model), :mod:`~tokensparse.tune.search` (fidelity and the search), :mod:`~tokensparse.tune.run`
(the run and the choice, :func:`tune`), :mod:`~tokensparse.tune.report` (the rows, CSV and plot).
"""
from .cost import CostModel, Schedule, probe, time_blocks
from .report import Candidate, TuneResult, plot_tune, write_tune_csv
from .run import (
    SCREEN_IMAGES,
    SEARCH_IMAGES,
    batches,
    beyond_noise,
    check_methods,
    check_target,
    default_methods,
    load_images,
    make_setup,
    tune,
)
from .search import Evaluator, refines
from .space import (
    TUNABLE,
    DiffRateKnob,
    EViTKnob,
    EvoViTKnob,
    Knob,
    MCTFKnob,
    MixKnob,
    PiToMeKnob,
    PPTKnob,
    ToFuKnob,
    ToMeKnob,
    TopKKnob,
    ZeroTPruneKnob,
)

__all__ = [
    "SCREEN_IMAGES",
    "SEARCH_IMAGES",
    "TUNABLE",
    "Candidate",
    "CostModel",
    "DiffRateKnob",
    "EViTKnob",
    "Evaluator",
    "EvoViTKnob",
    "Knob",
    "MCTFKnob",
    "MixKnob",
    "PPTKnob",
    "PiToMeKnob",
    "Schedule",
    "ToFuKnob",
    "ToMeKnob",
    "TopKKnob",
    "TuneResult",
    "ZeroTPruneKnob",
    "batches",
    "beyond_noise",
    "check_methods",
    "check_target",
    "default_methods",
    "load_images",
    "make_setup",
    "plot_tune",
    "probe",
    "refines",
    "time_blocks",
    "tune",
    "write_tune_csv",
]
