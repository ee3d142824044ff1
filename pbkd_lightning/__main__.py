from pbkd_lightning.cli import main

main()
