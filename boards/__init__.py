"""Board definitions, one JSON file per supported board (docs/boards.md). Installed as the
package data `bastion.boards`, which is why this directory is a package; see bastion.paths."""
