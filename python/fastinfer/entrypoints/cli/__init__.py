"""The ``fastinfer`` command line: main.py (parser, subcommands, exit statuses), one module per subcommand
(generate.py), and the batch-file I/O of ``generate`` (batch_input.py, batch_output.py, batch_run.py)."""
