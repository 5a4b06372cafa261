from cinefx.cli import main

main()
