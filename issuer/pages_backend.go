package issuer

import (
	"context"
	"errors"
	"net/http"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/grants"
	"github.com/tokenpipe/tokenpipe/issuer/pages"
)

// pagesBackend is what the HTML pages use of the server: the same
// throttled password check as the password grant, the same revocations
// (announced to every instance's introspection cache) and grant changes as
// the JSON management API.
type pagesBackend struct{ s *Server }

func (b pagesBackend) CheckPassword(r *http.Request, endpoint, user, pass string) error {
	err := b.s.checkPassword(r, endpoint, user, pass)
	var oe *oauthError
	switch {
	case errors.Is(err, clients.ErrInvalidGrant):
		return pages.ErrWrongPassword
	case errors.As(err, &oe):
		return &pages.Refused{Status: oe.status, RetryAfter: oe.retryAfter}
	}
	return err
}

func (b pagesBackend) Secure(r *http.Request) bool { return b.s.secure(r) }

func (b pagesBackend) RevokeApplication(ctx context.Context, client, user, reason string) (int, error) {
	s := b.s
	revoke := grants.RevokeApplication
	if user == "" {
		revoke = grants.RevokeKnown // every subject of the client, its own included
	}
	res, err := revoke(ctx, s.db, s.grantStream(), s.cfg.Topology.Stream, client, user, reason)
	if errors.Is(err, grants.ErrNoApplication) {
		return 0, pages.ErrNoApplication
	}
	if err != nil {
		return 0, err
	}
	s.grantRevoked(res, client, user, reason)
	return len(res.Digests), nil
}

func (b pagesBackend) SetGrant(ctx context.Context, client, grant string, allow bool, by string) error {
	err := b.s.changeGrant(ctx, client, grant, allow, by)
	if errors.Is(err, clients.ErrNotFound) {
		return pages.ErrNoClient
	}
	return err
}
