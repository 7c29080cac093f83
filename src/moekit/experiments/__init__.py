"""Ready-made experiments behind the `moekit` subcommands."""
