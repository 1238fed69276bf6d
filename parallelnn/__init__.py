"""parallelnn: train a model under interchangeable parallel strategies and measure which one pays off.

Start at ``parallelnn/cli.py`` (the verbs), then ``runner.py`` (a run's stages), ``trainer.py`` (the one
training loop), ``workload.py`` (what is trained: the public :class:`Workload`), ``workloads/`` (the
built-in ones) and ``parallel/`` (how the work is spread over processes).

From Python: ``parallelnn.run(workload_or_spec, **options)`` and ``parallelnn.Workload``.
"""

__version__ = "0.1.0"
__all__ = ["Workload", "Metrics", "run"]


def __getattr__(name: str):
    # Imported on first use, so that `import parallelnn` (and every CLI call) stays cheap.
    if name in ("Workload", "Metrics"):
        from parallelnn import workload

        return getattr(workload, name)
    if name == "run":
        from parallelnn.api import run

        return run
    raise AttributeError(f"module 'parallelnn' has no attribute {name!r}")
