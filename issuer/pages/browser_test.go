package pages_test

import (
	"context"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// chromium finds a Chromium to drive: TOKENPIPE_CHROMIUM, else the usual
// names on PATH. Without one the browser tests skip, saying so (.ci/run
// installs Debian's chromium when it is missing).
func chromium(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("TOKENPIPE_CHROMIUM"); p != "" {
		return p
	}
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Skip("browser test skipped: no Chromium found (apt-get install chromium, or set TOKENPIPE_CHROMIUM)")
	return ""
}

// newTab starts a headless Chromium with a fresh profile, at a phone's
// width, and returns a tab whose actions time out after a minute.
func newTab(t *testing.T) context.Context {
	t.Helper()
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromium(t)),
		chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU, chromedp.NoFirstRun, chromedp.NoDefaultBrowserCheck,
		// This machine and CI have no network beyond the test's own
		// loopback servers: nothing else may be dialled.
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(390, 844),
	}
	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	tab, cancelTab := chromedp.NewContext(alloc)
	ctx, cancel := context.WithTimeout(tab, time.Minute)
	t.Cleanup(func() { cancel(); cancelTab(); cancelAlloc() })
	testenv.Must(t, chromedp.Do(ctx, chromedp.EmulateViewport(390, 844)), "start Chromium")
	return ctx
}

// shot saves a full-page PNG as docs/screenshots/NAME.png's source when
// TOKENPIPE_SCREENSHOTS names a directory; otherwise it does nothing, so
// test runs never write into the repository.
func shot(name string) chromedp.Action[chromedp.Void] {
	dir := os.Getenv("TOKENPIPE_SCREENSHOTS")
	return chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
		if dir == "" {
			return nil
		}
		png, err := chromedp.FullScreenshot(100)(ctx, t)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dir, name+".png"), png, 0o644)
	})
}

// text is the visible text of the page's main element.
func text(ctx context.Context, t *testing.T) string {
	t.Helper()
	s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("main")))
	testenv.Must(t, err, "read the page")
	return s
}

// signIn fills and submits a sign-in form the way a person does.
func signIn(base, area, user, pass string) chromedp.Action[chromedp.Void] {
	return chromedp.Steps(
		chromedp.Navigate(base+area),
		chromedp.WaitVisible(chromedp.CSS("#username")),
		chromedp.SendKeys(chromedp.CSS("#username"), user),
		chromedp.SendKeys(chromedp.CSS("#password"), pass),
		chromedp.Click(chromedp.CSS("button[type=submit]")),
	)
}

// TestAccountPageRemovesApplication: a user signs in, sees the application
// that holds her tokens, removes it after confirming (three clicks from the
// sign-in form), and sees it gone; its tokens are then inactive at
// introspection and its refresh token is refused.
func TestAccountPageRemovesApplication(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := newTab(t)
	access, refresh := e.signInApp(t, "alice", alicePassword)

	testenv.Must(t, chromedp.Do(ctx,
		chromedp.Navigate(e.base+"/account"), chromedp.WaitVisible(chromedp.CSS("#username")), shot("signin"),
		signIn(e.base, "/account", "alice", alicePassword),
		chromedp.WaitVisible(chromedp.CSS("#app-mobile")), shot("account"),
	), "sign in")
	page := text(ctx, t)
	for _, want := range []string{"My applications", "mobile", "profile", "First authorized", "Last issued", "Signed in as alice"} {
		if !strings.Contains(page+signedIn(ctx, t), want) {
			t.Fatalf("the account page lacks %q:\n%s", want, page)
		}
	}
	if strings.Contains(page, access) || strings.Contains(page, refresh) {
		t.Fatal("the account page shows a token")
	}

	testenv.Must(t, chromedp.Do(ctx,
		chromedp.Click(chromedp.CSS(`a[aria-label="Remove access for mobile"]`)),
		chromedp.WaitVisible(chromedp.CSS("section.confirm")), shot("confirm"),
	), "ask to remove")
	if !e.active(t, access) {
		t.Fatal("asking for the confirmation already revoked the token")
	}
	testenv.Must(t, chromedp.Do(ctx,
		chromedp.Click(chromedp.CSS("section.confirm button.danger")),
		chromedp.WaitVisible(chromedp.CSS("p.flash")), shot("removed"),
	), "confirm removal")
	page = text(ctx, t)
	if !strings.Contains(page, "Access removed for mobile") || !strings.Contains(page, "No application holds tokens for you") {
		t.Fatalf("after removal the page says:\n%s", page)
	}
	if e.active(t, access) {
		t.Fatal("the removed application's access token is still active")
	}
	if status, body := e.call(t, "/oauth2/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}}); status != 400 || body["error"] != "invalid_grant" {
		t.Fatalf("the removed application's refresh = %d %v, want invalid_grant", status, body)
	}

	// Signed out, the page is the sign-in form again.
	testenv.Must(t, chromedp.Do(ctx,
		chromedp.Click(chromedp.CSS("form.signout button")),
		chromedp.WaitVisible(chromedp.CSS("#username")),
	), "sign out")
	if page := text(ctx, t); !strings.Contains(page, "You are signed out") {
		t.Fatalf("after sign-out the page says:\n%s", page)
	}
}

// signedIn is the header's text (who is signed in).
func signedIn(ctx context.Context, t *testing.T) string {
	t.Helper()
	s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("header")))
	testenv.Must(t, err, "read the header")
	return s
}

// TestAccountPageInBrowserRefusesBadForms: wrong passwords through the form
// are throttled, and a form whose CSRF token was removed is refused (403)
// and changes nothing.
func TestAccountPageInBrowserRefusesBadForms(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := newTab(t)
	access, _ := e.signInApp(t, "alice", alicePassword)

	testenv.Must(t, chromedp.Do(ctx,
		signIn(e.base, "/account", "alice", alicePassword),
		chromedp.WaitVisible(chromedp.CSS("#app-mobile")),
		chromedp.Click(chromedp.CSS(`a[aria-label="Remove access for mobile"]`)),
		chromedp.WaitVisible(chromedp.CSS("section.confirm")),
		// What a forged form lacks: the token.
		chromedp.Evaluate[chromedp.Void](`document.querySelector('main input[name=csrf]').remove()`),
		chromedp.Click(chromedp.CSS("section.confirm button.danger")),
		chromedp.WaitVisible(chromedp.CSS("p.error")), shot("forbidden"),
	), "post without the CSRF token")
	if page := text(ctx, t); !strings.Contains(page, "did not come from this site") {
		t.Fatalf("a form without its CSRF token got:\n%s", page)
	}
	title, err := chromedp.Run(ctx, chromedp.Title())
	testenv.Must(t, err, "title")
	if !strings.HasPrefix(title, "Forbidden") {
		t.Fatalf("page title %q, want the 403 page", title)
	}
	if !e.active(t, access) {
		t.Fatal("a form without its CSRF token revoked the token")
	}

	// Bob guesses: each wrong password answered, then the throttle, even
	// for the right one.
	testenv.Must(t, chromedp.Do(ctx,
		chromedp.Navigate(e.base+"/account"),
		chromedp.Click(chromedp.CSS("form.signout button")),
		chromedp.WaitVisible(chromedp.CSS("#username")),
	), "alice signs out")
	for range perUserSource {
		testenv.Must(t, chromedp.Do(ctx, signIn(e.base, "/account", "bob", "a guess"), chromedp.WaitVisible(chromedp.CSS("p.error"))), "guess")
		if page := text(ctx, t); !strings.Contains(page, "wrong") {
			t.Fatalf("a wrong password got:\n%s", page)
		}
	}
	testenv.Must(t, chromedp.Do(ctx, signIn(e.base, "/account", "bob", bobPassword), chromedp.WaitVisible(chromedp.CSS("p.error")), shot("throttled")), "right password while throttled")
	if page := text(ctx, t); !strings.Contains(page, "Too many failed sign-ins") {
		t.Fatalf("the right password while throttled got:\n%s", page)
	}
}

// TestAdminPageTurnsRefreshOff: an administrator signs in, turns the
// refresh_token grant off for a client, and that client's next refresh is
// refused with unauthorized_client; the admin's user view and the pipeline
// panel show the pipeline's state.
func TestAdminPageTurnsRefreshOff(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := newTab(t)
	_, refresh := e.signInApp(t, "alice", alicePassword)

	testenv.Must(t, chromedp.Do(ctx,
		signIn(e.base, "/admin", "ops", adminPassword),
		chromedp.WaitVisible(chromedp.CSS("#client-mobile")), shot("admin"),
		chromedp.Click(chromedp.CSS(`button[aria-label="Turn refresh tokens off for mobile"]`)),
		chromedp.WaitVisible(chromedp.CSS("p.flash")),
	), "turn refresh off")
	if page := text(ctx, t); !strings.Contains(page, "mobile: refresh_token is now off") {
		t.Fatalf("after turning refresh off the page says:\n%s", page)
	}
	if status, body := e.call(t, "/oauth2/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}}); status != 400 || body["error"] != "unauthorized_client" {
		t.Fatalf("refresh with the grant off = %d %v, want unauthorized_client", status, body)
	}

	testenv.Must(t, chromedp.Do(ctx,
		chromedp.SendKeys(chromedp.CSS("#name"), "alice"),
		chromedp.Click(chromedp.CSS(`form[action="/admin/user"] button`)),
		chromedp.WaitVisible(chromedp.CSS("#app-mobile")), shot("admin-user"),
		chromedp.Navigate(e.base+"/admin/pipeline"),
		chromedp.WaitVisible(chromedp.CSS("h1")), shot("pipeline"),
	), "user view and pipeline panel")
	page := text(ctx, t)
	for _, want := range []string{"Stream " + e.p.Topo.Stream, "Consumer " + e.p.Topo.Persister, "KEDA lag", "ACTIVE"} {
		if !strings.Contains(page, want) {
			t.Fatalf("the pipeline panel lacks %q:\n%s", want, page)
		}
	}
	refreshMeta, err := chromedp.Run(ctx, chromedp.AttributeValue(chromedp.CSS(`meta[http-equiv=refresh]`), "content"))
	testenv.Must(t, err, "refresh meta")
	if !refreshMeta.Exists || refreshMeta.Value == "" {
		t.Fatal("the pipeline panel does not refresh itself")
	}

	// Turned on again, the same refresh token works: the switch revoked
	// nothing.
	testenv.Must(t, chromedp.Do(ctx,
		chromedp.Navigate(e.base+"/admin"),
		chromedp.Click(chromedp.CSS(`button[aria-label="Turn refresh tokens on for mobile"]`)),
		chromedp.WaitVisible(chromedp.CSS("p.flash")),
	), "turn refresh on")
	if status, body := e.call(t, "/oauth2/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}}); status != 200 {
		t.Fatalf("refresh with the grant on again = %d %v", status, body)
	}
}
