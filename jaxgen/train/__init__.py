"""Train state, optimizer, tasks, the pure step and the loop."""
