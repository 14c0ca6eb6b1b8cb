"""The study engine around lpt_core: CLIs on top, rooms below (docs/design.md, "Layout"). Imports go
one way: CLIs -> engine -> trial, phase1 -> config; reports/ and serving/ never import engine."""
