"""Run `jaxgen` and die hard around one checkpoint save, as a preempted or crashing host would.

    python crash_driver.py after-commit STEP -- train ARGS...   # checkpoint STEP is durable, then os._exit
    python crash_driver.py during-save STEP -- train ARGS...    # os._exit while STEP is being written
    python crash_driver.py full-disk-on-1 STEP -- train ARGS... # process 1 alone fails to write STEP (ENOSPC);
                                                                # full-disk-on-0: process 0 alone
"""

import errno
import os
import sys

from jaxgen import checkpoint, cli

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


checkpoint.Checkpointer.save = save_then_die
sys.exit(cli.main(sys.argv[sys.argv.index("--") + 1:]))
