"""The operator: the site converges on its declaration (power, provisioning, maintenance).
`core` decides (pure), `runner` observes and acts, `cli` is `bastion machines|plan|apply`."""
