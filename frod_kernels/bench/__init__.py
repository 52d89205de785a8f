"""frod-bench: how much faster frod-kernels makes FRoD on this machine, and that it computes the same thing.

Run ``frod-bench`` (or ``python -m frod_kernels.bench``; ``--help`` for the options). Suites:

* ``check`` (:mod:`.check`): every backend under every engine path against the float64 reference; a failure makes
  the exit status 1 and names the backend, path and tensor.
* ``layer`` (:mod:`.layer`): one adapted layer's forward+backward: ``frod_linear`` per backend, PEFT FRoD, PEFT
  LoRA r=32, a frozen ``nn.Linear``.
* ``train`` (:mod:`.train`): AdamW steps of a Llama-style model with adapters on q_proj/v_proj.
* ``init`` (:mod:`.init`): projection setup, PEFT against frod-kernels.

``--out DIR`` writes ``results.json`` (machine, versions, date, command beside every number) and PNG plots
(:mod:`.plots`); ``--summarize DIR/results.json`` prints the short table again. Timing and memory conventions:
:mod:`.common`.
"""
