// Package check verifies tokenpipe's deployment files without a cluster or a
// container engine: the kustomize builds decoded strictly into the Kubernetes
// API types, the Compose file, the Dockerfile and the Grafana dashboard.
//
// It is a separate module (github.com/tokenpipe/tokenpipe/deploy/check) so
// the service's own module carries no Kubernetes dependencies. Run it with
//
//	cd deploy/check && go test -count=1 ./...
package check
