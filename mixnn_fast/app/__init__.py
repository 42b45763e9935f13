"""What a user runs: the ``mixnn`` command (cli), the embedded demo, the results table
(experiments) and the files a run leaves for a person (report)."""
