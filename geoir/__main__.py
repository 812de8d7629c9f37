from geoir.cli import main

main()
