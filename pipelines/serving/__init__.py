"""`mrcnn-cli serve`: the model behind an HTTP endpoint on Ray Serve (docs/design.md, "Serving")."""
