"""Run `jaxgen` and die hard around one checkpoint save, as a preempted or crashing host would.

    python crash_driver.py after-commit STEP -- train ARGS...   # checkpoint STEP is durable, then os._exit
    python crash_driver.py during-save STEP -- train ARGS...    # os._exit while STEP is being written
    python crash_driver.py full-disk-on-1 STEP -- train ARGS... # process 1 alone fails to write STEP (ENOSPC);
                                                                # full-disk-on-0: process 0 alone
    python crash_driver.py full-log-at STEP -- train ARGS...    # metrics.jsonl cannot take STEP's record (ENOSPC)
    python crash_driver.py full-at-end 0 -- train ARGS...       # the loss curve of the run's end cannot be written
    python crash_driver.py bad-batch-at STEP -- train ARGS...   # STEP's batch cannot be read (a damaged image)
"""

import errno
import json
import os
import sys

from jaxgen import checkpoint, cli, metrics

mode, crash_step = sys.argv[1], int(sys.argv[2])
original_save = checkpoint.Checkpointer.save


def save_then_die(self, step, *args, **kwargs):
    if mode.startswith("full-disk-on-"):
        import jax

        if step == crash_step and jax.process_index() == int(mode.removeprefix("full-disk-on-")):
            raise OSError(errno.ENOSPC, "No space left on device", "/scratch/x")
        return original_save(self, step, *args, **kwargs)
    original_save(self, step, *args, **kwargs)
    if step == crash_step:
        if mode == "after-commit":
            self.wait()
        os._exit(137)


def append_until_full(path, line):
    if json.loads(line)["step"] == crash_step:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    original_append(path, line)


def plot_on_a_full_disk(metrics_path, out_png, *args):
    raise OSError(errno.ENOSPC, "No space left on device", str(out_png))


original_append = metrics.append_line
if mode == "full-log-at":
    metrics.append_line = append_until_full
elif mode == "full-at-end":
    from jaxgen.train import loop

    loop.plot_loss_curve = plot_on_a_full_disk
elif mode == "bad-batch-at":
    from jaxgen.errors import DataError
    from jaxgen.train import loop

    original_next = loop.next_in_lockstep

    def next_or_damaged(iterator, step):
        if step == crash_step:
            raise DataError("image '/data/cats/7.png' cannot be read: image file is truncated")
        return original_next(iterator, step)

    loop.next_in_lockstep = next_or_damaged
else:
    checkpoint.Checkpointer.save = save_then_die
sys.exit(cli.main(sys.argv[sys.argv.index("--") + 1:]))
