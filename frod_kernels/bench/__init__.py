"""frod-bench: how much faster frod-kernels makes FRoD on this machine, and that it computes the same thing.

Run ``frod-bench`` (or ``python -m frod_kernels.bench``; ``--help`` for the options). Suites:

* ``check`` (:mod:`.check`): every backend under every engine path against the float64 reference; a failure makes
  the exit status 1 and names the backend, path and tensor.
* ``overhead`` (:mod:`.overhead`): host time and dispatched ops of one forward+backward at 64 -> 64, 8 tokens:
  frozen ``nn.Linear``, PEFT LoRA r=8, PEFT FRoD, accelerated PEFT FRoD, ``FrodLinear``, each ``frod_linear`` path.
* ``kernels`` (:mod:`.kernels`): each kernel-family op on every backend that runs here, checked against its
  float64 twin; time, bandwidth of compulsory bytes.
* ``layer`` (:mod:`.layer`): one adapted layer's forward+backward: ``frod_linear`` per backend, PEFT FRoD, PEFT
  LoRA r=32, a frozen ``nn.Linear``.
* ``train`` (:mod:`.train`): AdamW steps of a Llama-style model with adapters on q_proj/v_proj.
* ``init`` (:mod:`.init`): projection setup, PEFT against frod-kernels (also at any size, each method in its own
  process: :mod:`.init_cli`, ``bench/init_projections.py``).

Shapes per size preset: :mod:`.sizes`. ``--out DIR`` writes ``results.json`` (machine, versions, date, command
beside every number) and PNG plots (:mod:`.plots`); ``--summarize DIR/results.json [--markdown]`` prints the short
tables again. Timing, launch counting and memory conventions: :mod:`.common`.
"""
