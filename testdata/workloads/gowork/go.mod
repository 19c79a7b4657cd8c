module ferrytest/gowork

go 1.22
