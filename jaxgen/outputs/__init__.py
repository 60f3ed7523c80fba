"""What comes out of a run: evaluation, generation, export and import, all from committed checkpoints.

Nothing here builds a trainer: a run is opened as its task's models and their
parameters (`runs.open_run`), placed on the devices present.
"""
