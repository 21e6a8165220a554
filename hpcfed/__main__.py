from hpcfed.cli import main

main()
