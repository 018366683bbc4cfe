"""Unit tests: no servers (engine math, spec parsing, locations, rules, static checks)."""
