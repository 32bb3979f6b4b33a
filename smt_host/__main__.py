from smt_host.cli import main

main()
