from smt_host.cli.main import main

main()
