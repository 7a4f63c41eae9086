"""Command-line programs: thin absl mains over the library (installed as eva-* console commands).

Library code never imports this package."""
