package cli

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tokenpipe/tokenpipe/internal/app"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/grants"
)

// demoPassword is a fresh password a person can type: 96 random bits.
// The demo prints it once; it is never a fixed, guessable one.
func demoPassword() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b) // never fails (crypto/rand panics instead)
	return base64.RawURLEncoding.EncodeToString(b)
}

// pagesDemo prepares the account and admin pages for a person to click
// through: a user signed in through two applications (so My applications
// lists both, and one can be removed in three clicks), and, when admin is
// not "" (the demo made up TOKENPIPE_ADMIN_USERS), that administrator with
// a fresh password. It returns the lines to print.
func pagesDemo(ctx context.Context, pool *pgxpool.Pool, base, admin string) ([]string, error) {
	id := app.RandomID()
	user, password := "demo-reader-"+id, demoPassword()
	// bcrypt's lowest cost, as the lifecycle step uses: a demo's users
	// guard nothing, and the demo runs in tests under the race detector.
	if err := clients.AddUser(ctx, pool, user, password, 4); err != nil {
		return nil, err
	}
	for _, app := range []string{"demo-phone-" + id, "demo-tablet-" + id} {
		secret, err := clients.Add(ctx, pool, app, []string{"profile", "email", "photos"}, []string{"password", "refresh_token"})
		if err != nil {
			return nil, err
		}
		if err := passwordSignIn(ctx, base, app, secret, user, password); err != nil {
			return nil, fmt.Errorf("sign %s in through %s: %w", user, app, err)
		}
	}
	// The page lists stored tokens: wait for the persister.
	deadline := time.Now().Add(30 * time.Second)
	for {
		apps, err := grants.Applications(ctx, pool, user)
		if err != nil {
			return nil, err
		}
		if len(apps) == 2 {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("the demo user's tokens were not persisted within 30s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	lines := []string{
		fmt.Sprintf("My applications  %s/account", base),
		fmt.Sprintf("                 user %s  password %s", user, password),
	}
	if admin == "" {
		return append(lines, fmt.Sprintf("Administration   %s/admin (for the users in TOKENPIPE_ADMIN_USERS)", base)), nil
	}
	adminPassword := demoPassword()
	if err := clients.AddUser(ctx, pool, admin, adminPassword, 4); err != nil {
		return nil, err
	}
	return append(lines,
		fmt.Sprintf("Administration   %s/admin", base),
		fmt.Sprintf("                 user %s  password %s", admin, adminPassword)), nil
}

// passwordSignIn has a client sign a user in with the password grant.
func passwordSignIn(ctx context.Context, base, client, secret, user, password string) error {
	form := url.Values{"grant_type": {"password"}, "username": {user}, "password": {password}, "scope": {"profile photos"}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/oauth2/token", strings.NewReader(form.Encode()))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(client, secret)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("password grant: HTTP %d", resp.StatusCode)
	}
	return nil
}
