"""What the command-line commands do: each returns an exit code and writes to the streams it is given.

evaluator.cli parses the arguments and exits the process; the library packages (rules, store, postmortem, ...)
never print or exit.
"""
