from reparam_cli.commands.app import main

main()
