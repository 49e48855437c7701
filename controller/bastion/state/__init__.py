"""What the controller keeps besides the site files: the event history (`events`, SQLite),
one-time Ignition URLs (`onetime`), install-once marks (`install`) and the secret store
(`secrets`). The history and the marks can be lost; the secrets are worth a backup."""
