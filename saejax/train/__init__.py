"""The trainer: ``python -m saejax.train --config configs/X.py --workdir DIR``.

Owns every training config field and its default (`recipe`), the pure jitted train step and its
objective (`step`), the loop with resume, logging and preemption (`loop`; `__main__` is the
command), stage 1 of stage-wise training (`headtrain`), the multi-host runtime (`distributed`),
compile checks for real topologies on fake devices (`aot`: ``python -m saejax.train.aot``) and
training-curve plots (`curves`). It is the top layer: it may import every other package (the loop
evaluates with `saejax.eval.quickeval` after training), and nothing outside it imports it.
"""
