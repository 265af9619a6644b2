"""`python -m castling_deploy` = the `castling-deploy` command."""
from .cli import main

main()
