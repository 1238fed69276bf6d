"""parallelnn: train a model under interchangeable parallel strategies and measure which one pays off.

Start at ``parallelnn/cli.py`` (the verbs), then ``trainer.py`` (the one training loop),
``workloads/`` (what is trained) and ``parallel/`` (how it is spread over processes).
"""

__version__ = "0.1.0"
