"""The `ablax` command line: one module per subcommand, dispatched by launch.cli."""
