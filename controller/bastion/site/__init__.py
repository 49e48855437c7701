"""The site directory: loading and validating it (`load`), what it becomes (`model`), and the one
currently served (`holder`). Import from the submodules."""
