"""`python -m castling_deploy.cli` = the `castling-deploy` command."""
from . import main

main()
