from walkaudit.cli import main

main()
