from dcx.cli.main import main

main()
