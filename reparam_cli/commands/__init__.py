"""The command line: `app.py` registers one file per command (`init`, `convert`, `verify`, `specs`,
`batch`, `inspect`); `common.py` holds their shared options and error handling."""
