"""The site directory: loading and validating it (`load`, `schema`) and the one currently served
(`holder`). What a loaded site is lives in bastion.model. Import from the submodules."""
