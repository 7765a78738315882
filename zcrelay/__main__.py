from zcrelay.cli import main

main()
