module recserve.local/pause

go 1.22
