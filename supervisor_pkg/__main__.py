from supervisor_pkg.entry import main

main()
