"""The PXE server: dnsmasq (DHCP, TFTP of iPXE) and an HTTP server for everything else."""
